//! Migrations in code: each component lists its own, the binary applies them all.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use sha2::{Digest, Sha256};

use crate::{Backend, Store, StoreError};

/// One schema change, written for both backends.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Unique, ordered id: `<component>_<NNNN>_<what>`, e.g. `registry_0001_capsules`.
    pub id: &'static str,
    /// PostgreSQL statements (may contain several, separated by `;`).
    pub postgres: &'static str,
    /// SQLite statements.
    pub sqlite: &'static str,
    /// Tables created here that hold a `tenant_id` column: on PostgreSQL they get
    /// `ENABLE` + `FORCE ROW LEVEL SECURITY` and the tenant isolation policy.
    pub tenant_tables: &'static [&'static str],
}

/// What a migration run did.
#[derive(Debug, Default, Clone)]
pub struct MigrationReport {
    /// Ids applied now.
    pub applied: Vec<String>,
    /// Ids that were already applied.
    pub already_applied: usize,
}

/// The PostgreSQL table comment that marks a table write-once: after every
/// migration run the serving role keeps only SELECT and INSERT on it. A
/// migration opts in with `COMMENT ON TABLE <t> IS 'anumate:append-only'`
/// (and should add a trigger refusing UPDATE and DELETE for the owner too).
pub const APPEND_ONLY_COMMENT: &str = "anumate:append-only";

const LOCK_KEY: i64 = 0x616e_756d_6174; // "anumat"

fn checksum(m: &Migration) -> String {
    let mut h = Sha256::new();
    h.update(m.postgres.as_bytes());
    h.update([0]);
    h.update(m.sqlite.as_bytes());
    for t in m.tenant_tables {
        h.update([0]);
        h.update(t.as_bytes());
    }
    hex::encode(h.finalize())
}

fn rls_sql(table: &str) -> String {
    format!(
        "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;\n\
         ALTER TABLE {table} FORCE ROW LEVEL SECURITY;\n\
         CREATE POLICY tenant_isolation ON {table} \
           USING (tenant_id = current_setting('app.tenant_id', true)) \
           WITH CHECK (tenant_id = current_setting('app.tenant_id', true));"
    )
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Grants `role` to `login` (as the connected owner) unless it has it already.
pub(crate) async fn grant_membership(
    db: &impl ConnectionTrait,
    role: &str,
    login: &str,
) -> Result<(), StoreError> {
    let role_lit = role.replace('\'', "''");
    let login_lit = login.replace('\'', "''");
    let sql = format!(
        "DO $$ BEGIN \
           IF NOT pg_has_role('{login_lit}', '{role_lit}', 'MEMBER') THEN \
             EXECUTE 'GRANT ' || quote_ident('{role_lit}') || ' TO ' || quote_ident('{login_lit}'); \
           END IF; \
         END $$;"
    );
    db.execute_unprepared(&sql).await?;
    Ok(())
}

/// Migrates through `db` (the owner's connection); `serving_login`, when it is
/// another login, is granted the serving role.
pub(crate) async fn run(
    store: &Store,
    db: &DatabaseConnection,
    serving_login: Option<&str>,
    migrations: &[Migration],
) -> Result<MigrationReport, StoreError> {
    let backend = match store.backend {
        Backend::Postgres => DbBackend::Postgres,
        Backend::Sqlite => DbBackend::Sqlite,
    };
    let tx = db.begin().await?;
    if store.backend == Backend::Postgres {
        // Serialize concurrent migrators (several replicas starting at once).
        tx.execute_raw(Statement::from_sql_and_values(
            backend,
            "SELECT pg_advisory_xact_lock($1)",
            vec![LOCK_KEY.into()],
        ))
        .await?;
    }
    tx.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS anumate_migrations (\
           id TEXT PRIMARY KEY, checksum TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .await?;
    let rows = tx
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT id, checksum FROM anumate_migrations",
        ))
        .await?;
    let mut applied_before = std::collections::HashMap::new();
    for row in rows {
        let id: String = row.try_get("", "id")?;
        let sum: String = row.try_get("", "checksum")?;
        applied_before.insert(id, sum);
    }

    let mut report = MigrationReport::default();
    for m in migrations {
        let sum = checksum(m);
        if let Some(existing) = applied_before.get(m.id) {
            if *existing != sum {
                return Err(StoreError::MigrationChanged(m.id.to_string()));
            }
            report.already_applied += 1;
            continue;
        }
        let mut sql = match store.backend {
            Backend::Postgres => m.postgres.to_string(),
            Backend::Sqlite => m.sqlite.to_string(),
        };
        if store.backend == Backend::Postgres {
            for table in m.tenant_tables {
                sql.push_str(";\n");
                sql.push_str(&rls_sql(table));
            }
        }
        tx.execute_unprepared(&sql).await?;
        tx.execute_raw(Statement::from_sql_and_values(
            backend,
            "INSERT INTO anumate_migrations (id, checksum, applied_at) VALUES ($1, $2, $3)",
            vec![m.id.into(), sum.into(), crate::now_micros().into()],
        ))
        .await?;
        report.applied.push(m.id.to_string());
    }

    if let (Backend::Postgres, Some(role)) = (store.backend, &store.app_role) {
        let role_q = quote_ident(role);
        let role_lit = role.replace('\'', "''");
        // Cluster-wide role: tolerate a concurrent creator.
        tx.execute_unprepared(&format!(
            "DO $$ BEGIN \
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role_lit}') THEN \
                 CREATE ROLE {role_q} NOLOGIN NOSUPERUSER NOBYPASSRLS; \
               END IF; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; \
             END $$;"
        ))
        .await?;
        tx.execute_unprepared(&format!(
            "DO $$ BEGIN \
               IF NOT pg_has_role(current_user, '{role_lit}', 'MEMBER') THEN \
                 EXECUTE 'GRANT {role_q} TO ' || quote_ident(current_user); \
               END IF; \
             END $$;\n\
             GRANT USAGE ON SCHEMA public TO {role_q};\n\
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role_q};\n\
             GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role_q};\n\
             REVOKE ALL ON anumate_migrations FROM {role_q};"
        ))
        .await?;
        if let Some(login) = serving_login {
            grant_membership(&tx, role, login).await?;
        }
        // Write-once tables (see [`APPEND_ONLY_COMMENT`]) lose UPDATE and DELETE
        // again after the blanket grant above.
        tx.execute_unprepared(&format!(
            "DO $$ DECLARE t record; BEGIN \
               FOR t IN SELECT c.relname FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'public' AND c.relkind = 'r' \
                   AND obj_description(c.oid, 'pg_class') = '{APPEND_ONLY_COMMENT}' LOOP \
                 EXECUTE 'REVOKE UPDATE, DELETE, TRUNCATE ON ' || quote_ident(t.relname) || ' FROM {role_q}'; \
               END LOOP; \
             END $$;"
        ))
        .await?;
    }
    tx.commit().await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_changes_with_content() {
        let a = Migration {
            id: "x",
            postgres: "a",
            sqlite: "a",
            tenant_tables: &[],
        };
        let b = Migration {
            id: "x",
            postgres: "a",
            sqlite: "b",
            tenant_tables: &[],
        };
        assert_ne!(checksum(&a), checksum(&b));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
