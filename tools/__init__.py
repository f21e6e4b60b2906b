"""Developer tools: the fuzz harness (tools/fuzz/) and the aarch64 emulation check (tools/arm64)."""
