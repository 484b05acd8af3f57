"""Recipe: train a tiny multimodal Qwen3.5 to caption scikit-learn's digit images ("digit: 7"), then report the
held-out caption accuracy (>= 90% in a few minutes on 2 CPU cores). Needs scikit-learn and Pillow:
`pip install -e ".[multimodal]"`. The recipe itself is qwax.multimodal.digits.

    python recipes/digits.py [--steps 400] [--seed 0]
"""

from qwax.multimodal.digits import main

if __name__ == "__main__":
    main()
