"""ipa_lib: Implicit Preference Alignment for pose-driven human image animation.

Heavy libraries (torch, diffusers, mlflow, mediapipe, great_expectations) are imported
inside the functions that need them, so `ipa --help` stays fast.
"""

__version__ = "0.1.0"
