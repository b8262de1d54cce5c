"""ember: a compiler for running language models on small devices.

`ember.load(...)` (ember/api.py) opens a model for applications; it is imported on first use,
so `import ember` stays cheap."""

__all__ = ["load", "Model"]


def __getattr__(name: str):
    if name in __all__:
        from ember import api
        return getattr(api, name)
    raise AttributeError(f"module 'ember' has no attribute {name!r}")
