// Command kiln-k8s is a multi-call binary holding the Kubernetes components
// that Kiln's test cluster runs: each invocation runs exactly one component
// in its own process (component-base keeps global logging state, so two
// components cannot share a process).
//
//	kiln-k8s apiserver ARGS...           (kube-apiserver)
//	kiln-k8s controller-manager ARGS...  (kube-controller-manager)
//	kiln-k8s scheduler ARGS...           (kube-scheduler)
//	kiln-k8s kubectl ARGS...             (kubectl)
//
// The component may also be chosen by the name the binary is called under
// (a symlink named kube-apiserver, kubectl, ...).
package main

import (
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata" // for CronJob time zone support

	"github.com/spf13/cobra"

	_ "k8s.io/client-go/plugin/pkg/client/auth" // kubectl auth plugins
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

var aliases = map[string]string{
	"apiserver":               "apiserver",
	"kube-apiserver":          "apiserver",
	"controller-manager":      "controller-manager",
	"kube-controller-manager": "controller-manager",
	"scheduler":               "scheduler",
	"kube-scheduler":          "scheduler",
	"kubectl":                 "kubectl",
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: %s {apiserver|controller-manager|scheduler|kubectl} [ARGS...]\n", filepath.Base(os.Args[0]))
	os.Exit(2)
}

func main() {
	component, ok := aliases[filepath.Base(os.Args[0])]
	if !ok {
		if len(os.Args) < 2 {
			usage()
		}
		if component, ok = aliases[os.Args[1]]; !ok {
			usage()
		}
		// Drop the subcommand so each component sees its usual argv.
		os.Args = append([]string{os.Args[0]}, os.Args[2:]...)
	}

	var command *cobra.Command
	switch component {
	case "apiserver":
		command = apiserver.NewAPIServerCommand()
	case "controller-manager":
		command = controllermanager.NewControllerManagerCommand()
	case "scheduler":
		command = scheduler.NewSchedulerCommand()
	case "kubectl":
		logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) // nolint:errcheck
		command = kubectlcmd.NewDefaultKubectlCommand()
		if err := cli.RunNoErrOutput(command); err != nil {
			kubectlutil.CheckErr(err)
		}
		return
	}
	os.Exit(cli.Run(command))
}
