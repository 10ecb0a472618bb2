"""Synthetic data: normal brain scans from the MNI152 template (`scans`), anomalies inserted into them with
exact masks (`lesions`), and labelled set folders of both written to disk (`sets`). Training, evaluation,
the speed benchmark, the renderer and the tests make their scans here."""
