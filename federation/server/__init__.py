"""The ServerApp side of the federation: the app (app.py), its session with the clients, the strategies."""
