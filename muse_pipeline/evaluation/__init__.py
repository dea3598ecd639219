"""Evaluation library (spec section 8): embed a split once (`embed`), score it (`score`), end-to-end
runs (`end_to_end`), and the eval.json / eval.md / terminal output (`tables`)."""
