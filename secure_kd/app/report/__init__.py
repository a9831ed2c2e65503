"""The audit: `secure-kd audit` (secure_kd.app.report.audit, which reaches attacks only through their
registry) and report.html (secure_kd.app.report.html). Part of the app layer; the engine never imports it.
"""
