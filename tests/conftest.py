"""Suite-wide settings.

CI (CI=true) runs hypothesis derandomized: the same examples every run, so a red CI is
reproducible and a green one is not luck. Local runs keep hypothesis' random exploration, which
is where new counterexamples come from.
"""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")
