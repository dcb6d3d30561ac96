<?php
// A PHP backend talking to comet over CometQL with mysqli.
//
// It does the three things an application backend does:
//   1. authorizes a user: stores the key the user's browser will connect with;
//   2. sends that user a private message (to every open tab, or queued);
//   3. publishes a message on a public channel.
//
// Settings come from the environment (defaults in brackets):
//   COMET_HOST [127.0.0.1]  COMET_PORT [3300]  COMET_PASSWORD [comet]
//   USER_ID [7]  USER_KEY [a random one]  CHANNEL [news]

// Throw on any CometQL error: its message names the offending value.
mysqli_report(MYSQLI_REPORT_ERROR | MYSQLI_REPORT_STRICT);

$env = fn (string $name, string $default) => getenv($name) ?: $default;
$userId = (int) $env('USER_ID', '7');
$userKey = $env('USER_KEY', bin2hex(random_bytes(16)));
$channel = $env('CHANNEL', 'news');

// CometQL is the MySQL protocol: log in as "root" (dev_id 0) to CometQL_v1.
$db = new mysqli(
    $env('COMET_HOST', '127.0.0.1'),
    'root',
    $env('COMET_PASSWORD', 'comet'),
    'CometQL_v1',
    (int) $env('COMET_PORT', '3300'),
);

// 1. The browser connects with myid=<userId>&sesion=<userKey>.
$db->execute_query('INSERT INTO users_auth (id, hash) VALUES (?, ?)', [$userId, $userKey]);
echo "authorized user $userId with key $userKey\n";

// 2. A private message: comet.js delivers it to subscribers of "msg".
//    affected rows: 1 when delivered or queued for an offline user.
$text = json_encode(['text' => 'Hello from PHP', 'from' => 'php']);
$db->execute_query('INSERT INTO users_messages (id, event, message) VALUES (?, ?, ?)', [$userId, 'greeting', $text]);
echo "private message to user $userId: affected {$db->affected_rows}\n";

// 3. A channel message: affected rows = connections it was written to.
$text = json_encode(['headline' => 'comet examples ran', 'from' => 'php']);
$db->execute_query('INSERT INTO pipes_messages (name, event, message) VALUES (?, ?, ?)', [$channel, 'update', $text]);
echo "published to $channel: written to {$db->affected_rows} connections\n";

$db->close();
