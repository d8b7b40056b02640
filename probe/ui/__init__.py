"""What a person looks at and works with in JupyterLab: the explorer widget (:mod:`~probe.ui.explore`) and the
classroom lab's exercises and checks (:mod:`~probe.ui.lab`). They call the library; no analysis lives here."""
