/* Routes UCX's log messages to Rust (`pdx_ucx_log_line`, which forwards them to `tracing`), instead of UCX's
 * default handler, which prints to stdout and would corrupt machine-readable output such as
 * `pdx bench kv --json`. In C because UCX hands the handler a `va_list`, which stable Rust cannot take. */
#include <stdarg.h>
#include <stdio.h>
#include <ucs/debug/log_def.h>

extern void pdx_ucx_log_line(int level, const char *file, unsigned line, const char *message);

static ucs_log_func_rc_t pdx_ucx_log_handler(const char *file, unsigned line, const char *function,
                                             ucs_log_level_t level,
                                             const ucs_log_component_config_t *comp_conf,
                                             const char *format, va_list ap)
{
    char message[1024];
    (void)function;
    /* Same filter as ucs_log_default_handler: messages above the component's level are not shown. */
    if ((level > comp_conf->log_level) && (level != UCS_LOG_LEVEL_PRINT)) {
        return UCS_LOG_FUNC_RC_STOP;
    }
    vsnprintf(message, sizeof(message), format, ap);
    pdx_ucx_log_line((int)level, file, line, message);
    return UCS_LOG_FUNC_RC_STOP;
}

void pdx_ucx_route_logs(void)
{
    ucs_log_push_handler(pdx_ucx_log_handler);
}
