-- Runs once when the container's cluster is created: the database, the application role and
-- `pyembed worker`'s login: an application role in pyembed_worker too (revision 0026), which
-- counts failed provider calls; the application login is not in it, so no app session counts.
CREATE DATABASE pyembed;
CREATE ROLE pyembed_app NOLOGIN;
CREATE ROLE pyembed_user LOGIN PASSWORD 'pyembed' IN ROLE pyembed_app;
CREATE ROLE pyembed_worker NOLOGIN;
CREATE ROLE pyembed_worker_user LOGIN PASSWORD 'pyembed' IN ROLE pyembed_app, pyembed_worker;
