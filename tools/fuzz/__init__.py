"""Fuzz what ct-edge reads from outside: image/DICOM files and the bundle manifest.

    python -m tools.fuzz                          # the long campaign (`make fuzz`)
    python -m tools.fuzz --cases 300 --quick      # a short one (tests/test_fuzz.py runs this)
    python -m tools.fuzz --replay tests/fixtures/fuzz

Targets and the rule every case must keep:
- input: `ct_edge.preprocess.preprocess(file or bytes, spec)` returns a finite float32
  (size, size, channels) array in [0, 1], or raises `ct_edge.errors.InputError`.
- manifest: `Bundle.load(folder)`, then `select()` and `read_verified()` of every artifact, succeed
  or raise `ct_edge.errors.BundleError`; an artifact that resolves outside the bundle is never read.

Anything else is a failure: another exception (crash), the worker process dying (a segfault or
abort in a decoder), a case running past the time limit (hang), a case raising the worker's
resident memory by more than the memory bound, or a MemoryError turned into an error message
(the guards should have refused the file before). Cases run one at a time in a separate worker
process (spawned, so a hang or a segfault cannot take the campaign down): the parent kills and
replaces a worker that overruns the time limit. The peak RSS of a case is measured by resetting
the kernel's high-water mark (/proc/self/clear_refs) before it and reading VmHWM after it.

Inputs come from generators (random bytes; generic byte mutation of real fixture files and of
derived BMP/TIFF/GIF/WebP seeds; structure-aware PNG, JPEG, TIFF, BMP and DICOM mutation with
valid checksums; headers claiming enormous dimensions; complete decompression bombs; deflated
DICOM bombs) and from deterministic sweeps (every truncation of small files). A campaign is
reproducible from its seed. With --save DIR every failing input is written there, named by
target, generator and hash; --replay runs such files again (tests/test_fuzz.py does, for
tests/fixtures/fuzz/).

Modules: cases (the Case, seeds, byte mutation, saved cases), images and dicom (format-aware
builders and generators), manifest (bundle-manifest cases and running one), campaign (a
campaign's cases from its seed), worker (the worker process), runner (Runner, Report,
run_campaign), __main__ (the command line).
"""
