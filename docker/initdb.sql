-- Runs once when the container's cluster is created: the database, the application role and
-- `pyembed worker`'s login: an application role in pyembed_worker too (revision 0026), which
-- counts failed provider calls, and in pyembed_operator (revision 0037), which acts for every
-- tenant: the one worker embeds every tenant's jobs and `metrics` (which logs in as it) reports
-- every tenant. The application login is in neither. No password here: 20-pyembed-docker.sh
-- sets each from the env file, as its SCRAM verifier.
CREATE DATABASE pyembed;
CREATE ROLE pyembed_app NOLOGIN;
CREATE ROLE pyembed_user LOGIN IN ROLE pyembed_app;
CREATE ROLE pyembed_worker NOLOGIN;
CREATE ROLE pyembed_operator NOLOGIN;
CREATE ROLE pyembed_worker_user LOGIN IN ROLE pyembed_app, pyembed_worker, pyembed_operator;
