/*
 * accelguard's SPANK plugin (docs/slurm.md): at each task's fork, before it execs, run
 * `accelguard slurm bind --job ID --pid PID`, which checks that the task sits inside the job
 * cgroup accelguard fenced (binding it if the Prolog could not) or, on cgroup v2, that Slurm's
 * own device program guards it. A failure fails the step: no task of a job runs unfenced.
 *
 * plugstack.conf:
 *   required /usr/lib/accelguard/accelguard_spank.so accelguard=/usr/bin/accelguard \
 *            config=/etc/accelguard/agent.toml
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(accelguard, 1);

#define MAX_PATH_ARG 4096

static const char *option(int ac, char **av, const char *name, const char *fallback)
{
    size_t length = strlen(name);
    for (int i = 0; i < ac; i++) {
        if (strncmp(av[i], name, length) == 0 && av[i][length] == '=') {
            return av[i] + length + 1;
        }
    }
    return fallback;
}

static int run_bind(const char *accelguard, const char *config, uint32_t job, pid_t task)
{
    char job_text[16];
    char pid_text[16];
    snprintf(job_text, sizeof job_text, "%u", job);
    snprintf(pid_text, sizeof pid_text, "%d", (int)task);
    char *const argv[] = {
        (char *)accelguard, "--config", (char *)config, "slurm", "bind",
        "--job", job_text, "--pid", pid_text, NULL,
    };
    char *const envp[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", NULL};
    pid_t child = fork();
    if (child < 0) {
        slurm_error("accelguard: fork failed: %s", strerror(errno));
        return -1;
    }
    if (child == 0) {
        execve(accelguard, argv, envp);
        fprintf(stderr, "accelguard: cannot run %s: %s\n", accelguard, strerror(errno));
        _exit(127);
    }
    int status = 0;
    while (waitpid(child, &status, 0) < 0) {
        if (errno != EINTR) {
            slurm_error("accelguard: waitpid failed: %s", strerror(errno));
            return -1;
        }
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        slurm_error("accelguard: binding job %u (task %d) failed (status %d): the step fails",
                    job, (int)task, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        return -1;
    }
    return 0;
}

int slurm_spank_task_post_fork(spank_t sp, int ac, char **av)
{
    if (!spank_remote(sp)) {
        return 0;
    }
    const char *accelguard = option(ac, av, "accelguard", "/usr/bin/accelguard");
    const char *config = option(ac, av, "config", "/etc/accelguard/agent.toml");
    if (strlen(accelguard) > MAX_PATH_ARG || strlen(config) > MAX_PATH_ARG) {
        slurm_error("accelguard: plugin argument too long");
        return -1;
    }
    uint32_t job = 0;
    pid_t task = 0;
    if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS ||
        spank_get_item(sp, S_TASK_PID, &task) != ESPANK_SUCCESS) {
        slurm_error("accelguard: cannot read the job id or the task pid");
        return -1;
    }
    return run_bind(accelguard, config, job, task);
}
