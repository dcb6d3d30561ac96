#!/usr/bin/env python3
"""A Python backend talking to comet over CometQL with PyMySQL.

It does the three things an application backend does:
  1. authorizes a user: stores the key the user's browser will connect with;
  2. sends that user a private message (to every open tab, or queued);
  3. publishes a message on a public channel.

Settings come from the environment (defaults in brackets):
  COMET_HOST [127.0.0.1]  COMET_PORT [3300]  COMET_PASSWORD [comet]
  USER_ID [7]  USER_KEY [a random one]  CHANNEL [news]
"""

import json
import os
import secrets

import pymysql

user_id = int(os.environ.get("USER_ID", "7"))
user_key = os.environ.get("USER_KEY") or secrets.token_hex(16)
channel = os.environ.get("CHANNEL", "news")

# CometQL is the MySQL protocol: log in as "root" (dev_id 0) to the database
# CometQL_v1. autocommit avoids a pointless transaction round trip.
db = pymysql.connect(
    host=os.environ.get("COMET_HOST", "127.0.0.1"),
    port=int(os.environ.get("COMET_PORT", "3300")),
    user="root",
    password=os.environ.get("COMET_PASSWORD", "comet"),
    database="CometQL_v1",
    autocommit=True,
)
with db.cursor() as cur:
    # 1. The browser connects with myid=<user_id>&sesion=<user_key>.
    cur.execute("INSERT INTO users_auth (id, hash) VALUES (%s, %s)", (user_id, user_key))
    print(f"authorized user {user_id} with key {user_key}")

    # 2. A private message: comet.js delivers it to subscribers of "msg".
    #    affected rows: 1 when delivered or queued for an offline user.
    text = json.dumps({"text": "Hello from Python", "from": "python"})
    cur.execute("INSERT INTO users_messages (id, event, message) VALUES (%s, %s, %s)", (user_id, "greeting", text))
    print(f"private message to user {user_id}: affected {cur.rowcount}")

    # 3. A channel message: affected rows = connections it was written to.
    text = json.dumps({"headline": "comet examples ran", "from": "python"})
    cur.execute("INSERT INTO pipes_messages (name, event, message) VALUES (%s, %s, %s)", (channel, "update", text))
    print(f"published to {channel}: written to {cur.rowcount} connections")
db.close()
