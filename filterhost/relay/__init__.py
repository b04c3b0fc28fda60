"""Delivery: DNS, the SMTP client and the queue runner."""
