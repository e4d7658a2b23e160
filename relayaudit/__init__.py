"""relayaudit: finds unapproved SMTP services and open mail relays in the ranges an ISO owns."""

__version__ = "0.1.0"
