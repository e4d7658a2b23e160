"""relayaudit: finds unapproved SMTP services and open mail relays in the ranges an ISO owns."""

import os

# relayaudit uses no pydantic plugins; without this, pydantic scans every installed
# distribution's entry points when the first model class is built, a tenth of a sweep command's
# start-up (30-40 ms of about 0.3 s). An operator's own setting is kept, and the command line
# removes ours once its models are built (restore_environment), so hooks never inherit it.
_SET_PLUGINS_OFF = "PYDANTIC_DISABLE_PLUGINS" not in os.environ
if _SET_PLUGINS_OFF:
    os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"


def restore_environment() -> None:
    """Undo the start-up setting above (alert hooks and children see the caller's environment)."""
    if _SET_PLUGINS_OFF:
        os.environ.pop("PYDANTIC_DISABLE_PLUGINS", None)


__version__ = "0.1.0"
