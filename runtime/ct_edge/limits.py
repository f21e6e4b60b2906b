"""What the runtime accepts, and the memory bound those limits are chosen to meet."""

# The memory bound: peak RSS of the runtime process (engine and model loaded) classifying any
# input it accepts, so a 1 GB Pi-class board keeps room for the rest. The limits below are chosen
# to meet it (benchmarks.memory.limit_input makes the largest accepted input of each kind).
MEMORY_BOUND_MB = 256
# 4,320 x 4,320 (18.7 M pixels): the largest chest detectors (43 cm CR/DX panels at 100 um,
# ~4,300 x 4,300) fit; a CT slice is 512 x 512. A 16-bit PNG costs ~6 bytes a pixel (source +
# float32 gray), an uncompressed DICOM ~8 (file bytes + pixels + float32 gray): at this limit the
# worst accepted input stays under MEMORY_BOUND_MB with either engine. Larger is refused as a bomb.
MAX_PIXELS = 4_320 * 4_320
# Pillow's decoders spend time and memory per row: a 72-byte PNG claiming 1 x 64,000,000 pixels
# took 5 s and 1.3 GB (found by tools/fuzz/). No scan is anywhere near this long on one side.
MAX_SIDE = 16_384
# The whole file is read into memory: an uncompressed 16-bit DICOM at MAX_PIXELS is 37 MB.
MAX_FILE_BYTES = 64 * 1024 * 1024
STRIP_ROWS = 256  # rows converted to gray at a time: no whole-image temporaries
