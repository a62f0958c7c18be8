"""OCR engines as plug-ins: what an engine returns and how it is found by name (base), and the engines textdiff
registers: ``tesseract`` (tesseract, the Tesseract program) and ``ppocr`` (ppocr, PP-OCRv4 through RapidOCR and
onnxruntime, loaded only when asked for). See docs/eval.md for which to use when."""

import importlib.util

from textdiff.ocr.base import (ImageLike, OcrEngine, OcrError, OcrLine, OcrMissingError, Reading, check_engine,
                               engine_names, make_engine, reading_of_lines, register_engine, to_pil)
from textdiff.ocr.tesseract import TesseractEngine, check_tesseract

PPOCR_PACKAGES = ("rapidocr_onnxruntime", "cv2")  # the models and onnxruntime; OpenCV's crops and resizes


def _ppocr(**settings) -> OcrEngine:
    # deferred: textdiff.ocr.ppocr imports OpenCV, and its engine onnxruntime, heavy and optional
    from textdiff.ocr.ppocr import PpOcrEngine

    return PpOcrEngine(**settings)


def _check_ppocr(**settings) -> None:
    """Find PP-OCR's packages without importing them (onnxruntime takes a second)."""
    missing = [name for name in PPOCR_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise OcrMissingError(f"the PP-OCR engine (eval.ocr_engine=ppocr, --engine ppocr) needs the Python "
                              f"package{'s' if len(missing) > 1 else ''} {' and '.join(missing)}: pip install -e "
                              "'.[annotate]' (rapidocr-onnxruntime, which ships the PP-OCRv4 models, and OpenCV), or "
                              "choose eval.ocr_engine=tesseract")


register_engine("tesseract", TesseractEngine, check_tesseract)
register_engine("ppocr", _ppocr, _check_ppocr)

__all__ = ["ImageLike", "OcrEngine", "OcrError", "OcrLine", "OcrMissingError", "Reading", "TesseractEngine",
           "check_engine", "engine_names", "make_engine", "reading_of_lines", "register_engine", "to_pil"]
