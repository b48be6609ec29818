"""Stage compose: the composed steps (score, place by rank or budget: ``pipeline``), placement reports
(``report``), the one composer and the Python API (``api``), the ``torch.compile`` backend (``backend``)."""
