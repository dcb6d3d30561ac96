// A JDBC backend for comet, run by tests/java/run with Debian's MariaDB
// Connector/J (libmariadb-java): an auth INSERT, a Statement batch and a
// PreparedStatement batch with rewriteBatchedStatements, SELECTs, and a
// server-side prepared publish of a non-ASCII string. Prints what it did;
// any failure is an exception and a non-zero exit.
//
// Usage: java -cp mariadb-java-client.jar:. CometJdbc PORT PASSWORD CHANNEL MESSAGE

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;

public class CometJdbc {
    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    public static void main(String[] args) throws Exception {
        String port = args[0];
        String password = args[1];
        String channel = args[2];
        String message = args[3];
        String base = "jdbc:mariadb://127.0.0.1:" + port + "/CometQL_v1?user=root&password=" + password;

        try (Connection c = DriverManager.getConnection(base + "&rewriteBatchedStatements=true")) {
            try (Statement st = c.createStatement()) {
                int n = st.executeUpdate("INSERT INTO users_auth (id, hash) VALUES (42, 'java-key-42')");
                check(n == 1, "users_auth INSERT affected " + n);
                System.out.println("auth insert: " + n);

                // A Statement batch: sent as one multi-statement COM_QUERY.
                for (int i = 1; i <= 6; i++) {
                    st.addBatch("INSERT INTO pipes_messages (name, event, message) VALUES ('" + channel
                            + "', 'batch', 'batch-" + i + "')");
                }
                int[] counts = st.executeBatch();
                check(counts.length == 6, "6 batch results, got " + counts.length);
                for (int k : counts) {
                    check(k == 1 || k == Statement.SUCCESS_NO_INFO, "batch count " + k);
                }
                System.out.println("statement batch: " + counts.length);
            }

            // A PreparedStatement batch: rewritten into one multi-row INSERT.
            try (PreparedStatement ps =
                    c.prepareStatement("INSERT INTO pipes_messages (name, event, message) VALUES (?, ?, ?)")) {
                for (int i = 1; i <= 3; i++) {
                    ps.setString(1, channel);
                    ps.setString(2, "pbatch");
                    ps.setString(3, "pbatch-" + i);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                check(counts.length == 3, "3 prepared batch results, got " + counts.length);
                System.out.println("prepared batch: " + counts.length);
            }
        }

        // Server-side prepared statements (COM_STMT_PREPARE / EXECUTE).
        try (Connection c = DriverManager.getConnection(base + "&useServerPrepStmts=true")) {
            // The subscriber is still there: it leaves after the last message.
            try (PreparedStatement ps = c.prepareStatement("SELECT name, users FROM pipes WHERE name = ?")) {
                ps.setString(1, channel);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "a row for " + channel);
                    check(rs.getString(1).equals(channel), "name " + rs.getString(1));
                    check(rs.getString(2).equals("1"), "users " + rs.getString(2));
                    System.out.println("select: " + rs.getString(1) + " " + rs.getString(2));
                }
            }
            try (Statement st = c.createStatement();
                    ResultSet rs = st.executeQuery("SELECT id FROM users_auth WHERE id = 42")) {
                check(rs.next() && rs.getString(1).equals("42"), "users_auth row 42");
                System.out.println("select users_auth: 42");
            }
            // Last: the subscriber leaves once it has this one.
            try (PreparedStatement ps =
                    c.prepareStatement("INSERT INTO pipes_messages (name, event, message) VALUES (?, ?, ?)")) {
                ps.setString(1, channel);
                ps.setString(2, "prepared");
                ps.setString(3, message);
                int n = ps.executeUpdate();
                check(n == 1, "prepared publish reached " + n + " subscribers, not 1");
                System.out.println("prepared publish: " + n);
            }
        }
    }
}
