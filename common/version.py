"""pdserve's version, which every service reports (``/get_server_info``, ``/health``, ``--version``).

Here rather than in the package's ``__init__``, so that a folder names it
without importing the package root (the commands that sit there import every
folder)."""

__version__ = "0.1.0"
