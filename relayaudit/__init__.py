"""relayaudit: finds unapproved SMTP services and open mail relays in the ranges an ISO owns."""

import os

# relayaudit uses no pydantic plugins; without this, pydantic scans every installed
# distribution's entry points when the first model class is built, a third of a sweep command's
# start-up (30-40 ms of about 0.3 s). An operator's own setting of the variable is kept.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

__version__ = "0.1.0"
