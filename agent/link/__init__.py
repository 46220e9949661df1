"""The MQTT link to the cloud: the client (mqtt.py) and the upload loop (uplink.py)."""
