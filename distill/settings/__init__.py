"""Settings: the distillation recipe (``config``: every field declared once), the dataclass parser the
CLIs share (``arguments``) and the generated configuration reference (``reference``).
"""
