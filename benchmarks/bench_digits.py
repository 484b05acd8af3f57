"""Digits captioning benchmark: held-out caption accuracy and wall time of the tiny multimodal recipe.

Reference measured in the same run: a scikit-learn logistic regression on the raw 8x8 pixels of the same split
(the accuracy a plain classifier reaches; the multimodal model has to generate the whole caption).

    python benchmarks/bench_digits.py [--steps 400]
"""

from __future__ import annotations

import argparse
import time

from qwax.multimodal.digits import DigitsRecipe, evaluate, train


def reference_accuracy(seed: int, test_fraction: float) -> float:
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_test = int(len(order) * test_fraction)
    test, train_idx = order[:n_test], order[n_test:]
    clf = LogisticRegression(max_iter=2000).fit(digits.data[train_idx], digits.target[train_idx])
    return float(clf.score(digits.data[test], digits.target[test]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DigitsRecipe.steps)
    parser.add_argument("--seed", type=int, default=DigitsRecipe.seed)
    args = parser.parse_args()
    recipe = DigitsRecipe(steps=args.steps, seed=args.seed)
    start = time.perf_counter()
    model, test, train_seconds = train(recipe, log=lambda line: None)
    accuracy = evaluate(model, test)
    total = time.perf_counter() - start
    ref = reference_accuracy(recipe.seed, recipe.test_fraction)
    print(f"digits captioning: accuracy {accuracy:.3f} on {len(test[1])} held-out images "
          f"(logistic regression on the same split: {ref:.3f}, ratio {accuracy / ref:.3f})")
    print(f"time: train {train_seconds:.1f}s (includes compilation), total {total:.1f}s ({recipe.steps} steps of "
          f"{recipe.batch_size})")


if __name__ == "__main__":
    main()
