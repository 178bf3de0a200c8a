"""Dev, test and benchmark harnesses: the CPU SGLang launcher (`engine`), process helpers
(`procs`, `redisproc`), the engine emulator, the recording sidecar and the demo.

Production code (tap, sidecar, router) never imports this package."""
