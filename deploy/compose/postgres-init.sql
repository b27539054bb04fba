-- The serving login of deploy/docker-compose.yml: owns no table, is not a
-- superuser and has no BYPASSRLS (`anumate serve` refuses to start otherwise).
-- `anumate migrate` (as anumate_owner) creates the app role and grants it.
CREATE ROLE anumate_server LOGIN PASSWORD 'anumate-server-dev';
GRANT CONNECT ON DATABASE anumate TO anumate_server;
