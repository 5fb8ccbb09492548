"""The objective: the loss-term registry (``terms``), pure loss functions (``losses``), the plan that
turns a config into what each model must produce and one weighted scalar (``plan``), and the
term-weight calibration aid (``calibrate``).
"""
