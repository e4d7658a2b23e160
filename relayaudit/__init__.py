"""relayaudit: finds unapproved SMTP services and open mail relays in the ranges an ISO owns."""

import os

# relayaudit uses no pydantic plugins; without this, pydantic scans every installed
# distribution's entry points when the first model class is built (30-40 ms of a sweep
# command's ~0.3 s start-up). Models are built on first use (defer_build), so the setting
# stays for the whole process; an operator's own setting is kept, and programs relayaudit
# starts (alert hooks) get the caller's environment without ours (child_environment).
_SET_PLUGINS_OFF = "PYDANTIC_DISABLE_PLUGINS" not in os.environ
if _SET_PLUGINS_OFF:
    os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"


def child_environment() -> dict[str, str]:
    """The environment for programs relayaudit starts: the caller's, without the setting above."""
    env = dict(os.environ)
    if _SET_PLUGINS_OFF:
        env.pop("PYDANTIC_DISABLE_PLUGINS", None)
    return env


__version__ = "0.1.0"
