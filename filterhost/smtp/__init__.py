"""The SMTP front end (aiosmtpd) and its policy."""
