"""A real SMTP server for the tests (aiosmtpd): accepts every mail, with or
without login, and appends each as a JSON line to a file.

    python3 smtp_sink.py PORT OUTFILE
"""
import email
import email.policy
import json
import sys
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


class Sink:
    def __init__(self, path):
        self.path = path

    async def handle_DATA(self, server, session, envelope):
        login = session.auth_data.login.decode() if session.auth_data else None
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        record = {
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "login": login,
            "subject": str(message["subject"]),
            "body": message.get_content(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return "250 OK"


def authenticate(server, session, envelope, mechanism, auth_data):
    return AuthResult(success=auth_data.password == b"secret", auth_data=auth_data)


port, path = int(sys.argv[1]), sys.argv[2]
controller = Controller(
    Sink(path),
    hostname="127.0.0.1",
    port=port,
    authenticator=authenticate,
    auth_require_tls=False,
)
controller.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
