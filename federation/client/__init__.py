"""The ClientApp side of the federation: one organization's app (app.py), handlers, workspace, policy."""
