-- Roles of the application database, for docker-compose.yml: the postgres image runs
-- this once, when it initialises an empty data directory, as POSTGRES_USER (the
-- superuser, used for nothing else) in POSTGRES_DB.
--
--   tollgate_owner  owns the database and applies the migrations (the worker's
--                   DATABASE_OWNER_URL); no superuser, no CREATEROLE
--   tollgate_app    group role; schema/003_least_privilege.sql grants it row access
--   tollgate        the login role of DATABASE_URL (worker and CLI), in tollgate_app
--
-- The passwords match docker-compose.yml; tests/test_compose.py runs this file against a
-- real Postgres and checks the two stay in step.

CREATE ROLE tollgate_owner LOGIN PASSWORD 'tollgate_owner';
CREATE ROLE tollgate_app NOLOGIN;
CREATE ROLE tollgate LOGIN PASSWORD 'tollgate' IN ROLE tollgate_app;
ALTER DATABASE tollgate OWNER TO tollgate_owner;
