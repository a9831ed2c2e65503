"""Cryptography of the federation: CKKS aggregation (he, he_params, codec), key ceremony (keys, identity)."""
