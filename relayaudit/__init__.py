"""relayaudit: finds unapproved SMTP services and open mail relays in the ranges an ISO owns."""

import os
from collections.abc import Iterable
from importlib import metadata

# relayaudit uses no pydantic plugins; without this, pydantic scans every installed
# distribution's entry points when the first model class is built (30-40 ms of a sweep
# command's ~0.3 s start-up). Models are built on first use (defer_build), so the setting
# stays for the whole process; an operator's own setting is kept, and programs relayaudit
# starts (alert hooks) never get ours (child_environment).
_SET_PLUGINS_OFF = "PYDANTIC_DISABLE_PLUGINS" not in os.environ
if _SET_PLUGINS_OFF:
    os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"


# what every alert hook program gets from the daemon's environment (where set there)
BASE_VARIABLES = ("PATH", "LANG", "TZ")


def child_environment(names: Iterable[str] = ()) -> dict[str, str]:
    """The environment for alert hook programs: BASE_VARIABLES and the variables `names` of the
    caller's environment, those that are set; never the whole of it (the daemon's own secrets,
    `{ env = "NAME" }` of its config, live there) and never the setting above."""
    env: dict[str, str] = {}
    for name in (*BASE_VARIABLES, *names):
        if name in os.environ and not (_SET_PLUGINS_OFF and name == "PYDANTIC_DISABLE_PLUGINS"):
            env[name] = os.environ[name]
    return env


# The version is written in pyproject.toml only; an installed relayaudit (a wheel, or an editable
# install from a checkout) carries it in its metadata. `relayaudit --version` adds the commit of a
# checkout (cli.py).
try:
    __version__ = metadata.version("relayaudit")
except metadata.PackageNotFoundError:  # the source tree on sys.path, never installed
    __version__ = "0+unknown"
