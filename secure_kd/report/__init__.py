"""The audit layer: `secure-kd audit` (secure_kd.report.audit, which reaches attacks only through
their registry and is the one module under secure_kd/ that does) and report.html (secure_kd.report.html).

The engine proper never imports this package.
"""
