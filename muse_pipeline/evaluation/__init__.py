"""Evaluation library (spec section 8): embed a split once (`embed`), score it (`score`), end-to-end
runs (`end_to_end`), the eval.json / eval.md / terminal output (`tables`) and the report figures
(`plots`)."""
