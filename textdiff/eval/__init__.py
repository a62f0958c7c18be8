"""Spelling evaluation: OCR (ocr), metrics (metrics), prompts and their synthetic renders (prompts), and
scoring images or a sampler per prompt and in aggregate (spelling). See docs/eval.md."""
