"""The shared attack/defense apparatus: what attacks and defenses both build on, written once.

Attacks and defenses never import each other (tests/project/test_layer_contract.py), yet they train and
measure the same things: tiny causal LMs (targets, shadows, references, teachers, students), toy
classifiers (the digits CNN, a bag-of-words text classifier), backdoor tasks, adversarial
perturbations, hardened query APIs, victims to attack, and canaries with their exposure. These live
here, one concept per module, between the services (`attacks`, `defenses`) and the engine
(`secure_kd`): the apparatus imports the engine and libraries, never `attacks`, `defenses`,
`federation` or the app. What the engine itself needs (trigger specifications, exposure and ROC
metrics, the query API) stays in the engine.
"""
