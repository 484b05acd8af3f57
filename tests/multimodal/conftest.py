"""Puts tests/multimodal on sys.path so its test modules import the shared helpers in hf_mm.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
