"""Spelling evaluation: metrics (metrics), prompts and their synthetic renders (prompts), scoring images or a
sampler per prompt and in aggregate with an OCR engine of textdiff/ocr (spelling), and the training run's
monitor (monitor). See docs/eval.md."""
