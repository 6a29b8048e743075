"""Using trained adapters: loading base + adapter (``session``), evaluate, generate, export."""
