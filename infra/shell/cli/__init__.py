"""``ccc``: the entry point (``main``), shared CLI state (``context``), tables and JSON
(``output``), and one module per command group."""
