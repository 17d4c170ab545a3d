"""One folder per model (``<name>/model.json`` + backend + network + resources) under the
contract in ``base``. A backend knows nothing about Slicer, files or processes: it takes a
Volume and typed prompts on its grid and returns a typed ``ModelOutput``."""
