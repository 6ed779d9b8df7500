"""The paper's experiments at CPU scale: data sets, models, training loops and measures shared by
``examples/`` and ``benchmarks/`` (MATH.md §10; the paper's Sections 3.1, 4.1, 5 and Appendices E, G).

Modules are imported on demand (``from explaind_math.experiments import digits``); some need the
``experiments`` extra (scikit-learn for the digits data set).
"""
