"""The files a run leaves and their readers: the checkpoint layout (:mod:`checkpoint`), the weights in a
checkpoint or an export (:mod:`weights`) and the ``.safetensors`` export (:mod:`export`). Training writes them,
sampling and ``tools/export.py`` read them, all through this package."""
