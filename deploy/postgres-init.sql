-- One server, two databases: Ratchet's store and Prefect's own.
CREATE DATABASE prefect;
