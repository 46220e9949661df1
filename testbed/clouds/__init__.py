"""Offline fakes of the clouds' MQTT surfaces, on mosquitto (never shipped)."""
