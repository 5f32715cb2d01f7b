-- Runs once when the container's cluster is created: the database and the application role.
CREATE DATABASE pyembed;
CREATE ROLE pyembed_app NOLOGIN;
CREATE ROLE pyembed_user LOGIN PASSWORD 'pyembed' IN ROLE pyembed_app;
