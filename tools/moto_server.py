#!/usr/bin/env python3
"""moto_server with DynamoDB's write operations serialized.

moto's DynamoDB is not safe under concurrent writes: TransactWriteItems deep-copies the
tables it touches, applies its items one by one and, when a condition fails, puts the copies
back, undoing any write another request made in between. DynamoDB itself serializes
transactions, so this runs moto's DynamoDB writes behind one re-entrant lock (a transaction
calls the others); everything else is moto as installed.

Usage: python3 tools/moto_server.py -H 127.0.0.1 -p 5000   (the arguments of moto_server)
Needs: pip install 'moto[server]'
"""
import sys
import threading

from moto.dynamodb.models import DynamoDBBackend

lock = threading.RLock()


def locked(method):
    def call(self, *args, **kwargs):
        with lock:
            return method(self, *args, **kwargs)

    return call


for name in ("transact_write_items", "put_item", "update_item", "delete_item", "batch_write_item"):
    setattr(DynamoDBBackend, name, locked(getattr(DynamoDBBackend, name)))

from moto.server import main  # noqa: E402

main(sys.argv[1:])
